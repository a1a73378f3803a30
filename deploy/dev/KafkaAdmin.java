// Readiness probe and topic setup for the dev Kafka broker started by services.sh.
//
// Why a Java file and not kafka-topics.sh: the broker jars come from Maven Central, not from a
// Kafka distribution, so there are no shell tools; the kafka-tools artifact would pull in all of
// Kafka Connect (Jetty, Jersey). One JVM start that waits for the cluster and creates every topic
// is also faster than one kafka-topics invocation per topic.
//
// Usage: KafkaAdmin BOOTSTRAP TIMEOUT_S ready [TOPIC:PARTITIONS ...]
//        KafkaAdmin BOOTSTRAP TIMEOUT_S describe
// Exit status 0 on success; 1 with a message on stderr otherwise.

import java.util.ArrayList;
import java.util.List;
import java.util.Properties;
import java.util.Set;
import java.util.concurrent.ExecutionException;
import java.util.concurrent.TimeUnit;
import org.apache.kafka.clients.admin.Admin;
import org.apache.kafka.clients.admin.AdminClientConfig;
import org.apache.kafka.clients.admin.DescribeClusterResult;
import org.apache.kafka.clients.admin.NewTopic;
import org.apache.kafka.common.errors.TopicExistsException;

public class KafkaAdmin {
    public static void main(String[] args) throws Exception {
        if (args.length < 3) {
            System.err.println("usage: KafkaAdmin BOOTSTRAP TIMEOUT_S ready|describe [TOPIC:PARTITIONS ...]");
            System.exit(2);
        }
        String bootstrap = args[0];
        long deadlineNanos = System.nanoTime() + TimeUnit.SECONDS.toNanos(Long.parseLong(args[1]));
        String command = args[2];

        Properties config = new Properties();
        config.put(AdminClientConfig.BOOTSTRAP_SERVERS_CONFIG, bootstrap);
        config.put(AdminClientConfig.REQUEST_TIMEOUT_MS_CONFIG, "3000");
        config.put(AdminClientConfig.DEFAULT_API_TIMEOUT_MS_CONFIG, "5000");
        config.put(AdminClientConfig.RECONNECT_BACKOFF_MAX_MS_CONFIG, "200");

        try (Admin admin = Admin.create(config)) {
            int brokers = waitForBroker(admin, bootstrap, deadlineNanos);
            if (command.equals("describe")) {
                Set<String> topics = admin.listTopics().names().get(5, TimeUnit.SECONDS);
                System.out.println("brokers=" + brokers + " topics=" + String.join(",", new java.util.TreeSet<>(topics)));
                return;
            }
            if (!command.equals("ready")) {
                System.err.println("unknown command '" + command + "': expected ready or describe");
                System.exit(2);
            }
            List<NewTopic> wanted = new ArrayList<>();
            for (int i = 3; i < args.length; i++) {
                String[] parts = args[i].split(":", 2);
                int partitions = parts.length == 2 ? Integer.parseInt(parts[1]) : 1;
                wanted.add(new NewTopic(parts[0], partitions, (short) 1));
            }
            createTopics(admin, wanted, deadlineNanos);
        }
    }

    /** Polls describeCluster until a broker answers, so "ready" means "serves metadata". */
    private static int waitForBroker(Admin admin, String bootstrap, long deadlineNanos) throws InterruptedException {
        Exception last = null;
        while (System.nanoTime() < deadlineNanos) {
            try {
                DescribeClusterResult cluster = admin.describeCluster();
                int brokers = cluster.nodes().get(3, TimeUnit.SECONDS).size();
                if (brokers > 0 && cluster.controller().get(3, TimeUnit.SECONDS) != null) {
                    return brokers;
                }
            } catch (ExecutionException | java.util.concurrent.TimeoutException error) {
                last = error;
            }
            Thread.sleep(200);
        }
        System.err.println("kafka at " + bootstrap + " did not answer describeCluster before the deadline"
                + (last == null ? "" : ": " + last));
        System.exit(1);
        return 0;
    }

    /** Creates each topic once; an existing topic is fine (idempotent `up`). Retries until the deadline
     *  because a freshly formatted KRaft node may refuse creation until its metadata is published. */
    private static void createTopics(Admin admin, List<NewTopic> wanted, long deadlineNanos) throws InterruptedException {
        for (NewTopic topic : wanted) {
            Exception last = null;
            boolean done = false;
            while (!done && System.nanoTime() < deadlineNanos) {
                try {
                    admin.createTopics(List.of(topic)).all().get(5, TimeUnit.SECONDS);
                    System.out.println("created topic " + topic.name() + " (" + topic.numPartitions() + " partitions)");
                    done = true;
                } catch (ExecutionException error) {
                    if (error.getCause() instanceof TopicExistsException) {
                        System.out.println("topic " + topic.name() + " exists");
                        done = true;
                    } else {
                        last = error;
                        Thread.sleep(200);
                    }
                } catch (java.util.concurrent.TimeoutException error) {
                    last = error;
                }
            }
            if (!done) {
                System.err.println("could not create topic " + topic.name() + " before the deadline: " + last);
                System.exit(1);
            }
        }
    }
}
